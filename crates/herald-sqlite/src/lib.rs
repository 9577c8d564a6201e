//! herald on SQLite, for the embedded development mode: the transactional
//! outbox and its store for the relay, and the inbox that makes consumers'
//! effects happen exactly once — the same contract as `herald-postgres`
//! (DESIGN.md guarantees 1, 2 and 4), proven by one conformance suite
//! (`herald-conformance`) that both stores run (here `tests/conformance.rs`).
//!
//! ```no_run
//! # async fn f() -> Result<(), herald_sqlite::StoreError> {
//! let db = herald_sqlite::SqliteConfig::new("herald-dev.db").open().await?;
//! let outbox = db.outbox(); // for herald_kafka::Relay
//! let inbox = db.inbox("projection");
//! # let _ = (outbox, inbox); Ok(()) }
//! ```
//!
//! # One file, one process
//!
//! SQLite has one writer at a time and no row locks. The file is opened in
//! WAL mode (readers never wait for the writer) with a busy timeout (a
//! writer waits for the current one instead of failing at once), so the API,
//! the relay and the consumers of one process share it. Claims are serialized
//! by an in-process lock held by each [`SqliteOutbox`] (and its clones):
//! **run one relay per file**, in the process that owns it. Several
//! processes may write the outbox, but only one may relay it.
//!
//! Write transactions should start with [`begin`] (`BEGIN IMMEDIATE`): a
//! deferred transaction that reads before it writes fails with a transient
//! "busy snapshot" error when another writer committed in between.
//!
//! # Layout
//! - `migrations/`: the outbox and inbox tables (SQLite types: uuids and
//!   timestamps as TEXT, payload BLOB, headers as JSON TEXT).
//! - [`SqliteConfig`] / [`SqliteDatabase`]: open a file (WAL, busy timeout,
//!   migrations, commit notifications for the relay).
//! - [`outbox`]: [`enqueue`](outbox::enqueue) in the caller's transaction,
//!   [`SqliteOutbox`] (the relay's store: claims serialized in process, mark
//!   or delete, wake-ups on commit), status and retention. The claim query
//!   and its ordering argument are in `src/sql/relay_claim.sql`.
//! - [`inbox`]: [`SqliteInbox`] — effects and the inbox row in one
//!   transaction; retention.
//! - [`classify`]: database errors as transient or permanent handler errors.

pub mod inbox;
pub mod outbox;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::HandlerError;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqliteOperation, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use tokio::sync::Notify;

pub use herald::inbox::Applied;
pub use inbox::SqliteInbox;
pub use outbox::{AfterPublish, OutboxRecord, OutboxStatus, SqliteOutbox, SqliteOutboxBatch};

/// The migrations of herald's own tables (`herald_outbox`, `herald_inbox`).
pub static MIGRATOR: Migrator = {
    let mut migrator = sqlx::migrate!("./migrations");
    // Services keep their own migrations in the same `_sqlx_migrations` table.
    migrator.ignore_missing = true;
    migrator
};

/// Errors of the SQLite store.
///
/// Its own enum, not one shared with `herald_postgres::StoreError` (whose
/// documentation has the whole argument): the core crate cannot hold the
/// `sqlx::Error` both wrap, [`StoreError::is_transient`] reads SQLite's
/// result codes where PostgreSQL reads SQLSTATE classes, and the variants
/// differ ([`StoreError::Open`] and [`StoreError::Decode`] are SQLite's).
/// Generic code sees either through `herald::OutboxStore::Error` and
/// `herald::InboxStore::Error`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Opening the database file failed.
    #[error("opening the SQLite database {path:?} failed: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying herald's migrations failed.
    #[error("applying herald's SQLite migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("{operation} failed: {source}")]
    Database {
        /// What herald was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Another transaction wrote an event of the same aggregate concurrently.
    /// SQLite serializes writers, so this only happens when the file is
    /// shared in ways herald does not expect; transient like its PostgreSQL
    /// counterpart: retry the whole transaction.
    #[error("another transaction wrote an event of the same aggregate concurrently: {source}")]
    AggregateConflict {
        /// The unique violation.
        #[source]
        source: sqlx::Error,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode outbox headers: {0}")]
    Encode(String),
    /// A stored value could not be read back (the file was edited by hand or
    /// by another program).
    #[error("cannot decode {what} stored in SQLite: {detail}")]
    Decode {
        /// Which value.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

impl StoreError {
    /// A `map_err` adapter naming the operation that failed.
    pub fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Database { operation, source }
    }

    /// Whether trying again may succeed (the database was busy or locked, a
    /// snapshot went stale, an I/O error, the pool timed out).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database { source, .. } | StoreError::Open { source, .. } => {
                is_transient(source)
            }
            StoreError::AggregateConflict { .. } => true,
            _ => false,
        }
    }
}

/// Applies herald's migrations (idempotent).
pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Starts a write transaction with `BEGIN IMMEDIATE`: it takes the file's
/// write lock at once (waiting up to the busy timeout), so it can never fail
/// later with a stale snapshot the way a deferred `BEGIN` that reads first
/// can. Use it for business transactions that enqueue events.
pub async fn begin(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, StoreError> {
    pool.begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(StoreError::db("starting a write transaction"))
}

/// Whether a database error may go away if the work is tried again.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            // The primary result code is the low byte of the extended one.
            // 5 BUSY (snapshot, timeout...), 6 LOCKED, 10 IOERR, 13 FULL,
            // 15 PROTOCOL (a lock race in WAL mode).
            .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13 | 15)),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// A database error as a handler error: transient when it may go away on
/// retry, permanent otherwise (constraint violations, bad data).
pub fn classify(error: sqlx::Error) -> HandlerError {
    if is_transient(&error) {
        HandlerError::transient(error)
    } else {
        HandlerError::permanent(error)
    }
}

/// How to open a SQLite database file for herald (a typed builder with
/// defaults).
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    path: PathBuf,
    busy_timeout: Duration,
    max_connections: u32,
    create_if_missing: bool,
    migrate: bool,
}

impl SqliteConfig {
    /// The database at `path`, with the defaults: busy timeout 5 s, 8
    /// connections, file created if missing, herald's migrations applied.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            busy_timeout: Duration::from_secs(5),
            max_connections: 8,
            create_if_missing: true,
            migrate: true,
        }
    }

    /// How long a writer waits for the current one before failing with a
    /// transient "database is locked" error.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The pool's size (at least 1).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Whether to create the file when it does not exist (on by default).
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.create_if_missing = create;
        self
    }

    /// Whether [`open`](Self::open) applies herald's migrations (on by
    /// default).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Connection options with herald's settings: WAL journal (readers and
    /// the writer do not block each other), the busy timeout, foreign keys
    /// on, and `synchronous = FULL` so a commit survives a crash of the
    /// machine, not only of the process.
    pub fn connect_options(&self) -> SqliteConnectOptions {
        SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(self.create_if_missing)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(self.busy_timeout)
            .foreign_keys(true)
    }

    /// Opens the pool (every connection reports committed outbox inserts to
    /// the relay, see [`SqliteDatabase::outbox`]) and applies the migrations.
    pub async fn open(&self) -> Result<SqliteDatabase, StoreError> {
        let wakeups = Arc::new(Notify::new());
        let hook_wakeups = Arc::clone(&wakeups);
        let pool = SqlitePoolOptions::new()
            .max_connections(self.max_connections)
            .after_connect(move |conn, _meta| {
                let wakeups = Arc::clone(&hook_wakeups);
                Box::pin(async move {
                    install_commit_notifications(conn, wakeups).await;
                    Ok(())
                })
            })
            .connect_with(self.connect_options())
            .await
            .map_err(|source| StoreError::Open {
                path: self.path.clone(),
                source,
            })?;
        if self.migrate {
            migrate(&pool).await?;
        }
        Ok(SqliteDatabase { pool, wakeups })
    }
}

/// The outbox table's name, as SQLite's update hook reports it.
const OUTBOX_TABLE: &str = "herald_outbox";

/// Makes `conn` wake the relay when a transaction that inserted outbox rows
/// commits: SQLite has no LISTEN/NOTIFY, but its update, commit and rollback
/// hooks tell exactly that, in process.
async fn install_commit_notifications(conn: &mut sqlx::SqliteConnection, wakeups: Arc<Notify>) {
    let mut handle = match conn.lock_handle().await {
        Ok(handle) => handle,
        Err(error) => {
            // Not fatal: the relay still polls at its interval.
            tracing::warn!(%error, "cannot install SQLite commit hooks; the relay will poll");
            return;
        }
    };
    let inserted = Arc::new(AtomicBool::new(false));
    let on_update = Arc::clone(&inserted);
    handle.set_update_hook(move |change| {
        if change.table == OUTBOX_TABLE && matches!(change.operation, SqliteOperation::Insert) {
            on_update.store(true, Ordering::Relaxed);
        }
    });
    let on_commit = Arc::clone(&inserted);
    handle.set_commit_hook(move || {
        if on_commit.swap(false, Ordering::Relaxed) {
            // notify_one keeps a permit when no relay waits right now, so a
            // commit during a relay pass is not missed.
            wakeups.notify_one();
        }
        true
    });
    handle.set_rollback_hook(move || inserted.store(false, Ordering::Relaxed));
}

/// An open SQLite database for herald: the pool, and the in-process wake-ups
/// that its connections send the relay on commits of outbox rows.
#[derive(Debug, Clone)]
pub struct SqliteDatabase {
    pool: SqlitePool,
    wakeups: Arc<Notify>,
}

impl SqliteDatabase {
    /// The pool, for business transactions (start them with [`begin`]).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The relay's store, woken at once when an enqueue commits on this
    /// pool. Every call shares nothing with the others: keep one (clone it
    /// for several relay tasks) so that claims stay serialized.
    pub fn outbox(&self) -> SqliteOutbox {
        SqliteOutbox::new(self.pool.clone()).wakeups(Arc::clone(&self.wakeups))
    }

    /// The inbox of consumer group `group`.
    pub fn inbox(&self, group: impl Into<String>) -> SqliteInbox {
        SqliteInbox::new(self.pool.clone(), group)
    }

    /// Closes every connection (checkpointing the WAL into the file).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A timestamp as stored: RFC 3339 UTC with a fixed width, the same format as
/// SQL's `strftime('%Y-%m-%dT%H:%M:%fZ')`, so text order is time order.
pub(crate) fn timestamp(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Parses a stored timestamp.
pub(crate) fn parse_timestamp(
    what: &'static str,
    text: &str,
) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| StoreError::Decode {
            what,
            detail: format!("{text:?}: {e}"),
        })
}

/// The SQLite `strftime` modifier that goes `age` back in time.
pub(crate) fn ago_modifier(age: Duration) -> String {
    format!("-{}.{:03} seconds", age.as_secs(), age.subsec_millis())
}

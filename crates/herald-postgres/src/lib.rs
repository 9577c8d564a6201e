//! herald on PostgreSQL: the transactional outbox and its store for the
//! relay, and the inbox that makes consumers' effects happen exactly once.
//!
//! The schema is owned by this crate and applied with [`migrate`]; a service
//! with migrations of its own runs both migrators against one database (each
//! ignores the other's applied versions).
//!
//! # Layout
//! - `migrations/`: the outbox, inbox and consumer-offset tables,
//!   timestamped.
//! - [`outbox`]: [`enqueue`](outbox::enqueue) in the caller's transaction,
//!   [`PgOutbox`] (the relay's store: a claim owns shards of aggregates
//!   through advisory locks and locks their rows `FOR UPDATE`; mark or
//!   delete, LISTEN/NOTIFY), status and retention. The claim's queries and
//!   its ordering argument are in `src/sql/relay_shards.sql` and
//!   `src/sql/relay_claim.sql`.
//! - [`slots`]: relay slots, the groups of shards an exactly-once relay
//!   leases ([`herald::SlotStore`]), and why its checkpoints make the relay
//!   publish each event once.
//! - `shards`: which shards a relay process tries next, between searches.
//! - `sql`: the claim's statements, assembled once from `src/sql/` around
//!   the one rule for parked aggregates (`src/sql/not_held_back.sql`).
//! - [`inbox`]: [`Inbox`] — effects and the inbox row in one transaction,
//!   one per event or batched with savepoints; retention; consumer offsets
//!   kept beside the effects ([`Dedupe`], [`herald::OffsetStore`]).
//! - [`classify`]: database errors as transient or permanent handler errors.

pub mod inbox;
pub mod outbox;
pub mod refusals;
mod shards;
pub mod slots;
mod sql;

use herald::HandlerError;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

pub use inbox::{Applied, Dedupe, Inbox};
pub use outbox::{AfterPublish, OutboxRecord, OutboxStatus, PgOutbox};
pub use slots::{PgSlotLease, RELAY_SLOTS};

/// The migrations of herald's own tables (`herald_outbox`, `herald_inbox`).
pub static MIGRATOR: Migrator = {
    let mut migrator = sqlx::migrate!("./migrations");
    // Services keep their own migrations in the same `_sqlx_migrations` table.
    migrator.ignore_missing = true;
    migrator
};

/// Errors of the PostgreSQL store.
///
/// Each store has its own error enum (`herald_sqlite::StoreError` is the
/// other), on purpose:
/// - code generic over stores already sees one store error through the
///   contracts (`herald::OutboxStore::Error`, `herald::InboxStore::Error`);
/// - what the two enums share wraps `sqlx::Error`, and the core crate
///   `herald` has no SQL dependency to hold it;
/// - they differ where callers look: [`StoreError::is_transient`] reads
///   PostgreSQL's SQLSTATE classes, SQLite's reads its result codes, out of
///   the same `sqlx::Error` type; only this store reports
///   [`StoreError::NotClaimed`], only SQLite has a file to open and values
///   it decodes by hand. One shared enum would list variants a store never
///   returns and need its SQL dialect as a type parameter to classify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Applying herald's migrations failed.
    #[error("applying herald's PostgreSQL migrations failed: {0}")]
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
    /// The relay asked to mark an event its batch had not claimed (a bug in
    /// the caller: nothing was marked).
    #[error("outbox row {id} is not in the claimed batch")]
    NotClaimed {
        /// The row's id.
        id: i64,
    },
    /// Another transaction wrote an event of the same aggregate concurrently:
    /// their order would be ambiguous, so this one is refused. Transient:
    /// retry the whole transaction (or serialize writers with a row lock).
    #[error("another transaction wrote an event of the same aggregate concurrently: {source}")]
    AggregateConflict {
        /// The unique violation.
        #[source]
        source: sqlx::Error,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode outbox headers: {0}")]
    Encode(String),
}

impl StoreError {
    /// A `map_err` adapter naming the operation that failed.
    pub fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Database { operation, source }
    }

    /// Whether trying again may succeed (lost connection, deadlock,
    /// serialization failure, server shutting down).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database { source, .. } => is_transient(source),
            StoreError::AggregateConflict { .. } => true,
            _ => false,
        }
    }
}

/// Migrations whose text changed after databases applied them, without
/// changing what they did to those databases: the version and the SHA-384
/// checksum of the text they applied.
///
/// - 20261127000004 gained `LOCK TABLE herald_outbox` before its copy into
///   the queue: a database that applied the earlier text is already past
///   the copy, so nothing is left to do but to accept its checksum.
const REWRITTEN_MIGRATIONS: [(i64, &str); 1] = [(
    20261127000004,
    "6d4ae486a697dd0f9ef2fc276559460d53b3b16de1a98de4cfd0c6bbc4b439be4a32b9ef14f5f19ccff91b7e0182ee32",
)];

/// Applies herald's migrations (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    accept_rewritten_migrations(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Records the current checksum of each of [`REWRITTEN_MIGRATIONS`] where
/// a database applied its earlier text, which sqlx would otherwise refuse
/// as a modified migration.
async fn accept_rewritten_migrations(pool: &PgPool) -> Result<(), StoreError> {
    let failed = |source| StoreError::Database {
        operation: "accepting the checksums of rewritten migrations",
        source,
    };
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await
        .map_err(failed)?;
    if table.is_none() {
        return Ok(());
    }
    for (version, earlier) in REWRITTEN_MIGRATIONS {
        let Some(current) = MIGRATOR.iter().find(|m| m.version == version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1
             WHERE version = $2 AND checksum = decode($3, 'hex')",
        )
        .bind(current.checksum.as_ref())
        .bind(version)
        .bind(earlier)
        .execute(pool)
        .await
        .map_err(failed)?;
    }
    Ok(())
}

/// Whether a database error may go away if the work is tried again: the
/// connection was lost ([`is_connection_lost`]), or the server refused the
/// work for now (serialization failure, deadlock, resources, a lock).
pub fn is_transient(error: &sqlx::Error) -> bool {
    is_connection_lost(error)
        || matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|code| {
            // 40: serialization failure / deadlock; 53: resources; 55P03:
            // lock not available.
            code.starts_with("40") || code.starts_with("53") || code == "55P03"
        }))
}

/// Whether a database error says the server cannot be reached now: no
/// connection in time, a connection lost or refused, a server shutting
/// down or starting up.
///
/// A protocol error counts: sqlx reports a connection closed during TLS
/// negotiation (`sslmode=prefer`, the default, asks every new connection
/// for TLS) as "unexpected response from SSLRequest: 0x00", because it
/// reads the answer byte from a socket at its end. Nothing the caller sends
/// can cause a protocol error; only the wire or the server can.
pub fn is_connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P: operator intervention
            // (admin or crash shutdown, cannot connect now).
            code.starts_with("08") || code.starts_with("57P")
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

/// A database error as a handler error: transient when it may go away on
/// retry, permanent otherwise (constraint violations, bad data). The message
/// keeps the database's text for logs and dead letters, never for API users.
pub fn classify(error: sqlx::Error) -> HandlerError {
    if is_transient(&error) {
        HandlerError::transient(error)
    } else {
        HandlerError::permanent(error)
    }
}

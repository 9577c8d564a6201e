//! herald on PostgreSQL: the transactional outbox, its relay's storage side,
//! and the inbox that makes consumers' effects happen exactly once.
//!
//! The schema is owned by this crate and applied with [`migrate`]; a service
//! with migrations of its own runs both migrators against one database (each
//! ignores the other's applied versions).
//!
//! # Layout
//! - `migrations/`: the outbox and inbox tables, timestamped.
//! - [`migrate`] / [`MIGRATOR`]: applies them.
//! - [`StoreError`]: this crate's error type.

use sqlx::migrate::Migrator;
use sqlx::PgPool;

/// The migrations of herald's own tables (`herald_outbox`, `herald_inbox`).
pub static MIGRATOR: Migrator = {
    let mut migrator = sqlx::migrate!("./migrations");
    // Services keep their own migrations in the same `_sqlx_migrations` table.
    migrator.ignore_missing = true;
    migrator
};

/// Errors of the PostgreSQL store.
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
}

/// Applies herald's migrations (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

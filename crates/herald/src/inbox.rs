//! The inbox, as a contract: a store (PostgreSQL in production, SQLite in the
//! embedded mode) runs a handler's database effects and records the event as
//! processed by its consumer group in ONE transaction, so a redelivered event
//! has no second effect (DESIGN.md guarantee 2).
//!
//! The contract, which every [`InboxStore`] keeps:
//! - the effects and the inbox row `(consumer group, event id)` commit
//!   together or not at all: failed effects leave no row, so a retry runs
//!   them again;
//! - an event the group already processed is answered with
//!   [`Applied::AlreadyProcessed`] and its effects do not run;
//! - two deliveries of one event to one group, even at the same time, apply
//!   it once; different groups each apply it once.
//!
//! Code that only needs this contract (a conformance suite, a runtime that
//! is generic over stores) is written against [`InboxStore`]; the stores'
//! own inherent methods remain the everyday API.

use std::future::Future;
use std::pin::Pin;

use uuid::Uuid;

use crate::HandlerError;

/// A future borrowing the connection that a handler's effects run on.
pub type EffectsFuture<'c> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'c>>;

/// A handler's database effects on a store's connection `C`, run inside
/// the inbox transaction (each store names its own: `herald_postgres::Effects`,
/// `herald_sqlite::Effects`).
pub type Effects<C> = Box<dyn for<'c> FnOnce(&'c mut C) -> EffectsFuture<'c> + Send>;

/// What happened to an event offered to an inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The effects ran and committed now.
    Now,
    /// This group had already processed the event: nothing ran.
    AlreadyProcessed,
}

/// The inbox of one consumer group in some store.
pub trait InboxStore: Send + Sync {
    /// The connection the effects run on, inside the inbox transaction (for
    /// sqlx stores, e.g. `sqlx::PgConnection`).
    type Connection: Send;
    /// The store's error for plain reads such as [`InboxStore::contains`].
    type Error: std::error::Error + Send + Sync + 'static;

    /// The consumer group this inbox records events for.
    fn group(&self) -> &str;

    /// Runs `effects` for `event_id` exactly once for this group: the effects
    /// and the inbox row commit in one transaction.
    ///
    /// Errors: the effects' own error (nothing is recorded, so a retry runs
    /// them again), or the store's error classified as transient or
    /// permanent.
    fn apply<F>(
        &self,
        event_id: Uuid,
        effects: F,
    ) -> impl Future<Output = Result<Applied, HandlerError>> + Send
    where
        F: for<'c> FnOnce(&'c mut Self::Connection) -> EffectsFuture<'c> + Send + 'static;

    /// Whether this group has processed `event_id`.
    fn contains(&self, event_id: Uuid) -> impl Future<Output = Result<bool, Self::Error>> + Send;
}

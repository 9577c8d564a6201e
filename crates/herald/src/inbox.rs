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

use uuid::Uuid;

use crate::HandlerError;

/// A handler's database effects on a store's connection `C`, run inside the
/// inbox transaction: an async closure that borrows the connection across
/// its awaits, written at the call site without boxing:
///
/// ```
/// # use herald::{Applied, HandlerError, InboxStore};
/// # async fn handle<S: InboxStore>(inbox: &S, event_id: uuid::Uuid) -> Result<Applied, HandlerError> {
/// inbox
///     .apply(event_id, async move |conn| {
///         // `conn` is `&mut S::Connection`, e.g. `&mut sqlx::PgConnection`:
///         // run the effects' statements on it.
///         let _ = conn;
///         Ok(())
///     })
///     .await
/// # }
/// ```
///
/// Every such closure implements it (a blanket implementation). It names
/// two views of one closure because stable Rust has no other way to say
/// both things a store needs:
/// - [`AsyncFnOnce`] lets the compiler infer the closure's argument type
///   (`conn` above needs no annotation);
/// - [`EffectsOnce`] bounds the future that one call returns, for every
///   borrow of the connection, as [`Send`]: stores run the effects on a
///   multi-threaded runtime, and `AsyncFnOnce` cannot require that of its
///   future on stable Rust.
pub trait Effects<C>:
    for<'c> AsyncFnOnce(&'c mut C) -> Result<(), HandlerError>
    + for<'c> EffectsOnce<'c, C>
    + Send
    + 'static
{
}

impl<C, F> Effects<C> for F where
    F: for<'c> AsyncFnOnce(&'c mut C) -> Result<(), HandlerError>
        + for<'c> EffectsOnce<'c, C>
        + Send
        + 'static
{
}

/// One call of [`Effects`] on a connection borrowed for `'c`: names the
/// future it returns, so that [`Effects`] can require it to be [`Send`].
/// Implemented for every closure `FnOnce(&'c mut C) -> impl Future + Send`
/// (async closures are such closures); stores call [`EffectsOnce::call`].
pub trait EffectsOnce<'c, C: 'c> {
    /// The future of one call: the effects' outcome, borrowing the
    /// connection for `'c`.
    type Future: Future<Output = Result<(), HandlerError>> + Send + 'c;

    /// Runs the effects on `conn`.
    fn call(self, conn: &'c mut C) -> Self::Future;
}

impl<'c, C: 'c, F, Fut> EffectsOnce<'c, C> for F
where
    F: FnOnce(&'c mut C) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'c,
{
    type Future = Fut;

    fn call(self, conn: &'c mut C) -> Fut {
        self(conn)
    }
}

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
    /// sqlx stores, e.g. `sqlx::PgConnection`). `'static` because
    /// [`Effects`] must accept a borrow of it for any lifetime, which a type
    /// that itself borrows could not outlive.
    type Connection: Send + 'static;
    /// The store's error for plain reads such as [`InboxStore::contains`].
    type Error: std::error::Error + Send + Sync + 'static;

    /// The consumer group this inbox records events for.
    fn group(&self) -> &str;

    /// Runs `effects` (an async closure, see [`Effects`]) for `event_id`
    /// exactly once for this group: the effects and the inbox row commit in
    /// one transaction.
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
        F: Effects<Self::Connection>;

    /// Whether this group has processed `event_id`.
    fn contains(&self, event_id: Uuid) -> impl Future<Output = Result<bool, Self::Error>> + Send;
}

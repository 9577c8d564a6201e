//! herald's core: typed events, the wire envelope that carries them, and the
//! retry policy shared by every runtime. Nothing here knows about Kafka or SQL,
//! so an event family can be declared, encoded and tested without a broker.
//!
//! An event family is a serde enum, internally tagged by `event_type`, whose
//! variants each wrap one event struct:
//!
//! ```
//! use chrono::{DateTime, Utc};
//! use serde::{Deserialize, Serialize};
//! use uuid::Uuid;
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
//! pub struct AccountOpened {
//!     #[event(id)]
//!     pub event_id: Uuid,
//!     #[event(key)]
//!     pub account_id: Uuid,
//!     #[event(time)]
//!     pub timestamp: DateTime<Utc>,
//! }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
//! #[serde(tag = "event_type")]
//! #[event(aggregate = "account")]
//! pub enum AccountEvent { AccountOpened(AccountOpened) }
//!
//! use herald::Event;
//! let opened = AccountEvent::AccountOpened(AccountOpened {
//!     event_id: Uuid::new_v4(), account_id: Uuid::new_v4(), timestamp: Utc::now(),
//! });
//! assert_eq!(opened.event_type(), "AccountOpened");
//! let envelope = herald::Envelope::encode(&opened, "/bank").unwrap();
//! let back: AccountEvent = envelope.decode().unwrap();
//! assert_eq!(back.event_id(), opened.event_id());
//! ```
//!
//! # Layout
//! - [`event`]: the [`Event`] and [`EventPayload`] traits, and their
//!   derives (from `herald-derive`), which implement them for a family
//!   without hand-written `match`es.
//! - [`envelope`]: [`Envelope`], the bytes and headers of one record on the
//!   wire (DESIGN.md "Events and the wire format"), with typed decode errors.
//! - [`trace`]: the W3C trace context carried in `traceparent`/`tracestate`.
//! - [`retry`]: [`RetryPolicy`], exponential backoff with jitter and a cap.
//! - [`handler`]: [`HandlerError`], how a handler says transient or permanent.
//! - [`outbox`]: the [`OutboxStore`] contract between an outbox store and
//!   the relay, and [`SlotStore`] / [`SlotLease`] / [`Checkpoint`], what the
//!   exactly-once relay needs of a store on top of it.
//! - [`inbox`]: the [`InboxStore`] contract of an inbox: effects and the
//!   inbox row in one transaction, [`Applied`] once per group.
//! - [`offsets`]: [`OffsetStore`], consumer offsets kept in the store and
//!   moved in the handler's transaction.

pub mod envelope;
pub mod event;
pub mod handler;
pub mod inbox;
pub mod offsets;
pub mod outbox;
pub mod retry;
mod tagged;
pub mod trace;

pub use envelope::{headers, DecodeError, EncodeError, Envelope};
pub use event::{Event, EventPayload};
/// Derives [`EventPayload`](trait@EventPayload) for a struct and
/// [`Event`](trait@Event) for a family enum: see [`event`].
pub use herald_derive::{Event, EventPayload};

// The derives name `::herald`, which must resolve in this crate too.
extern crate self as herald;
pub use handler::{panic_text, ErrorClass, HandlerError};
pub use inbox::{Applied, Effects, EffectsOnce, InboxStore};
pub use offsets::{OffsetStore, Position};
pub use outbox::{
    AfterPublish, Checkpoint, OutboxBatch, OutboxRecord, OutboxStatus, OutboxStore, PendingRecord,
    SlotLease, SlotStore,
};
pub use retry::RetryPolicy;
pub use trace::TraceContext;

#[doc(hidden)]
pub mod __private {
    //! Re-exports used by the derives so that user crates need no extra deps.
    pub use chrono;
    pub use uuid;
}

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
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! pub struct AccountOpened { pub event_id: Uuid, pub account_id: Uuid, pub timestamp: DateTime<Utc> }
//!
//! herald::event_payload!(AccountOpened, id = event_id, key = account_id, time = timestamp);
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! #[serde(tag = "event_type")]
//! pub enum AccountEvent { AccountOpened(AccountOpened) }
//!
//! herald::event_family!(AccountEvent, aggregate = "account", [AccountOpened]);
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
//! - [`event`]: the [`Event`] and [`EventPayload`] traits and the macros that
//!   implement them for a family without hand-written `match`es.
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

pub mod envelope;
pub mod event;
pub mod handler;
pub mod inbox;
pub mod outbox;
pub mod retry;
pub mod trace;

pub use envelope::{headers, DecodeError, EncodeError, Envelope};
pub use event::{Event, EventPayload};
pub use handler::{panic_text, ErrorClass, HandlerError};
pub use inbox::{Applied, EffectsFuture, InboxStore};
pub use outbox::{
    Checkpoint, OutboxBatch, OutboxRecord, OutboxStatus, OutboxStore, PendingRecord, SlotLease,
    SlotStore,
};
pub use retry::RetryPolicy;
pub use trace::TraceContext;

#[doc(hidden)]
pub mod __private {
    //! Re-exports used by the macros so that user crates need no extra deps.
    pub use chrono;
    pub use uuid;
}

//! Typed events.
//!
//! An event *family* is a Rust enum, internally tagged by `event_type`, whose
//! variants each wrap one event struct named like the variant. The struct
//! implements [`EventPayload`] (id, aggregate key, time), usually through
//! `#[derive(herald::EventPayload)]` with its three fields marked, and the
//! enum implements [`Event`] through `#[derive(herald::Event)]`, which lists
//! the variants once (they are the family's event types), delegates to the
//! variant so nobody writes the `match` by hand, and checks at compile time
//! that the enum is tagged `#[serde(tag = "event_type")]`:
//!
//! ```
//! use chrono::{DateTime, Utc};
//! use serde::{Deserialize, Serialize};
//! use uuid::Uuid;
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
//! struct OrderShipped {
//!     #[event(id)]
//!     event_id: Uuid,
//!     #[event(key)] // the aggregate id: anything `ToString`
//!     order_id: Uuid,
//!     #[event(time)]
//!     shipped_at: DateTime<Utc>,
//!     carrier: String,
//! }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
//! #[serde(tag = "event_type")]
//! #[event(aggregate = "order")]
//! enum OrderEvent {
//!     OrderShipped(OrderShipped),
//! }
//!
//! use herald::Event as _;
//! assert_eq!(OrderEvent::EVENT_TYPES, ["OrderShipped"]);
//! ```
//!
//! A family without the tag does not compile:
//!
//! ```compile_fail
//! # use serde::{Deserialize, Serialize};
//! #[derive(Serialize, Deserialize, herald::Event)]
//! #[event(aggregate = "order")]
//! enum Untagged {}
//! ```

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

/// The fields every single event carries, whatever its family.
pub trait EventPayload {
    /// Unique id of this event; consumers deduplicate on it.
    fn event_id(&self) -> Uuid;
    /// The id of the aggregate the event belongs to. It becomes the Kafka
    /// record key, so one aggregate's events share a partition and keep order.
    fn aggregate_id(&self) -> String;
    /// When the event happened (UTC).
    fn occurred_at(&self) -> DateTime<Utc>;
}

/// A family of events that travels on one topic, e.g. `OrderEvent`.
///
/// The JSON form must be internally tagged with an `event_type` field whose
/// value is [`Event::event_type`]: `#[serde(tag = "event_type")]`.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type, e.g. `"order"` (goes to the outbox and `ce_source`).
    const AGGREGATE_TYPE: &'static str;
    /// Every `event_type` this family can decode. A record with another type
    /// is *unknown* to this consumer (renamed, removed, or newer), which the
    /// runtime skips or dead-letters instead of failing to parse.
    const EVENT_TYPES: &'static [&'static str];

    /// The name of this event's type, as written in `event_type`.
    fn event_type(&self) -> &'static str;
    /// See [`EventPayload::event_id`].
    fn event_id(&self) -> Uuid;
    /// See [`EventPayload::aggregate_id`].
    fn aggregate_id(&self) -> String;
    /// See [`EventPayload::occurred_at`].
    fn occurred_at(&self) -> DateTime<Utc>;

    /// Whether `event_type` names a member of this family.
    fn is_known_type(event_type: &str) -> bool {
        Self::EVENT_TYPES.contains(&event_type)
    }

    /// Decodes `payload`, whose header names it an `event_type`, straight
    /// into that variant's struct. `None` means "no fast path here": the
    /// caller then decodes the enum as a whole, which also produces the
    /// error. `#[derive(herald::Event)]` implements it; a hand-written family need
    /// not.
    ///
    /// Why: serde decodes an internally tagged enum by first buffering the
    /// whole object into an intermediate tree, which costs more than the
    /// rest of a consumed record's handling (`herald-bench consumer`).
    #[doc(hidden)]
    fn decode_variant(event_type: &str, payload: &[u8]) -> Option<Self> {
        let _ = (event_type, payload);
        None
    }
}

/// The fast path of [`Event::decode_variant`] for one variant: `payload`
/// decoded as the variant's struct `T`, in one pass that also checks that
/// its `event_type` field is `event_type` (and hides that field from `T`,
/// as the enum's own decoding does). Anything unusual (another tag, a
/// missing one, invalid JSON, a body `T` refuses) is `None`, so that the
/// enum's own decoding decides and reports the error.
#[doc(hidden)]
pub fn decode_variant<T: DeserializeOwned, E>(
    payload: &[u8],
    event_type: &str,
    wrap: fn(T) -> E,
) -> Option<E> {
    crate::tagged::decode_tagged(payload, event_type).map(wrap)
}

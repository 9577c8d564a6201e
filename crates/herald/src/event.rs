//! Typed events.
//!
//! An event *family* is a Rust enum, internally tagged by `event_type`, whose
//! variants each wrap one event struct named like the variant. The struct
//! implements [`EventPayload`] (id, aggregate key, time — usually through
//! [`event_payload!`](crate::event_payload)) and the enum implements [`Event`]
//! through [`event_family!`](crate::event_family), which delegates to the
//! variant so nobody writes the `match` by hand.

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
    /// error. [`event_family!`] implements it; a hand-written family need
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

/// Implements [`EventPayload`] for a struct from the names of its fields.
///
/// `key` may be any field that implements `ToString` (a UUID, a string...).
///
/// ```
/// # use chrono::{DateTime, Utc}; use uuid::Uuid;
/// struct Shipped { event_id: Uuid, order_id: Uuid, at: DateTime<Utc> }
/// herald::event_payload!(Shipped, id = event_id, key = order_id, time = at);
/// ```
#[macro_export]
macro_rules! event_payload {
    ($ty:ty, id = $id:ident, key = $key:ident, time = $time:ident) => {
        impl $crate::EventPayload for $ty {
            fn event_id(&self) -> $crate::__private::uuid::Uuid {
                self.$id
            }
            fn aggregate_id(&self) -> ::std::string::String {
                ::std::string::ToString::to_string(&self.$key)
            }
            fn occurred_at(
                &self,
            ) -> $crate::__private::chrono::DateTime<$crate::__private::chrono::Utc> {
                self.$time
            }
        }
    };
}

/// Implements [`Event`] for an enum whose variants each wrap a struct
/// implementing [`EventPayload`]; the variant name is the `event_type`.
///
/// ```ignore
/// herald::event_family!(OrderEvent, aggregate = "order", [OrderCreated, OrderShipped]);
/// ```
#[macro_export]
macro_rules! event_family {
    ($family:ident, aggregate = $aggregate:literal, [$($variant:ident),+ $(,)?]) => {
        impl $crate::Event for $family {
            const AGGREGATE_TYPE: &'static str = $aggregate;
            const EVENT_TYPES: &'static [&'static str] = &[$(stringify!($variant)),+];

            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => stringify!($variant),)+
                }
            }
            fn event_id(&self) -> $crate::__private::uuid::Uuid {
                match self {
                    $(Self::$variant(e) => $crate::EventPayload::event_id(e),)+
                }
            }
            fn aggregate_id(&self) -> ::std::string::String {
                match self {
                    $(Self::$variant(e) => $crate::EventPayload::aggregate_id(e),)+
                }
            }
            fn occurred_at(
                &self,
            ) -> $crate::__private::chrono::DateTime<$crate::__private::chrono::Utc> {
                match self {
                    $(Self::$variant(e) => $crate::EventPayload::occurred_at(e),)+
                }
            }
            fn decode_variant(event_type: &str, payload: &[u8]) -> ::std::option::Option<Self> {
                match event_type {
                    $(stringify!($variant) => $crate::event::decode_variant(payload, event_type, Self::$variant),)+
                    _ => ::std::option::Option::None,
                }
            }
        }
    };
}

/// The fast path of [`Event::decode_variant`] for one variant: `payload`
/// decoded as the variant's struct `T`, when its `event_type` field is
/// `event_type`. Anything unusual (another tag, a missing one, a struct that
/// refuses the tag field as unknown, invalid JSON) is `None`, so that the
/// enum's own decoding decides, exactly as without this path.
#[doc(hidden)]
pub fn decode_variant<T: DeserializeOwned, E>(
    payload: &[u8],
    event_type: &str,
    wrap: fn(T) -> E,
) -> Option<E> {
    #[derive(serde::Deserialize)]
    struct Tag<'a> {
        #[serde(borrow)]
        event_type: std::borrow::Cow<'a, str>,
    }
    let tag: Tag<'_> = serde_json::from_slice(payload).ok()?;
    if tag.event_type != event_type {
        return None;
    }
    serde_json::from_slice(payload).ok().map(wrap)
}

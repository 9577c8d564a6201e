//! The event family herald's own tests send: `Step` number `seq` of a keyed
//! sequence, so a test can check per-key order by the numbers it reads back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Step `seq` (counting up from 0) of the sequence of `key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct Step {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// Aggregate key.
    #[event(key)]
    pub key: String,
    /// Position in the key's sequence.
    pub seq: u64,
    /// When it was made.
    #[event(time)]
    pub at: DateTime<Utc>,
}

/// A family with one type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "test")]
pub enum TestEvent {
    /// See [`Step`].
    Step(Step),
}

/// Step `seq` of `key`.
pub fn step(key: &str, seq: u64) -> TestEvent {
    TestEvent::Step(Step {
        event_id: Uuid::new_v4(),
        key: key.to_owned(),
        seq,
        at: Utc::now(),
    })
}

/// `keys` × `per_key` steps (keys `key-0`…), interleaved so that each key's
/// steps are in order.
pub fn steps(keys: usize, per_key: u64) -> Vec<TestEvent> {
    (0..per_key)
        .flat_map(|seq| (0..keys).map(move |k| step(&format!("key-{k}"), seq)))
        .collect()
}

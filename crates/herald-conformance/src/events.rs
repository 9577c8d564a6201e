//! The event family the checks enqueue: step `seq` of aggregate `key`, so a
//! check reads each aggregate's order back from the numbers it published.
//!
//! The suite's own family rather than `herald_test::events`: that crate
//! links rdkafka and sqlx, which the store contract does not need.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Step `seq` (counting up from 0) of aggregate `key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct Step {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// Aggregate key.
    #[event(key)]
    pub key: String,
    /// Position in the aggregate's sequence.
    pub seq: u64,
    /// When it was made.
    #[event(time)]
    pub at: DateTime<Utc>,
}

/// A family with one type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "test")]
pub enum ConformanceEvent {
    /// See [`Step`].
    Step(Step),
}

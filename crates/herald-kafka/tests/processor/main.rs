//! The exactly-once processor against the real Kafka broker (librdkafka's
//! mock cluster does not implement transactions faithfully). One test
//! binary; each test has its own random topics, group and instance ids.

mod crash;
mod fencing;
mod poison;
mod rebalance;
mod state;
mod support;

//! The processor (exactly once, and at least once) against the real Kafka
//! broker (librdkafka's mock cluster does not implement transactions
//! faithfully). One test binary; each test has its own random topics, group
//! and instance ids.

mod at_least_once;
mod cluster;
mod crash;
mod duplicates;
mod fencing;
mod outage;
mod partitioned;
mod poison;
mod rebalance;
mod state;
mod support;

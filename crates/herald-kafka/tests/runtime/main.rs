//! The consumer runtime and the publisher against the real Kafka broker.
//! One test binary; each test has its own random topics and group.

mod cluster;
mod crash;
mod delivery;
mod outage;
mod parking;
mod poison;
mod publisher;
mod rebalance;
mod shutdown;
mod support;

//! The outbox, the relay and the inbox against real PostgreSQL and Kafka.
//! Each test has its own database and topic.

mod claims;
mod cluster;
mod connection_loss;
mod crash;
mod exactly_once;
mod faults;
mod handler_faults;
mod inbox;
mod late_commit;
mod notify;
mod offsets;
mod ordering;
mod publish_iff_commit;
mod refused;
mod support;

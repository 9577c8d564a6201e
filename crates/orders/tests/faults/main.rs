//! The service under faults, as separate processes (on servers of the
//! test's own where the faults hit the servers). A binary of its own, so
//! that its load (up to nine processes, a broker and a PostgreSQL) does not
//! run beside the other service tests; its scenarios take turns
//! (`support::one_at_a_time`).

mod broker_outage;
mod cluster;
mod effectively_once;
mod network;
mod outage;
mod rolling;
mod support;

//! The service under faults, as separate processes on servers of the test's
//! own. A binary of its own, so that its load (nine processes, a broker and
//! a PostgreSQL) does not run beside the other service tests.

mod effectively_once;
mod outage;
mod rolling;
mod support;

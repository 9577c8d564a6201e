//! The order service: API rules through `oneshot` (no socket) on a fresh
//! database, and the whole pipeline against real Kafka and PostgreSQL.

mod api;
mod auth;
mod embedded;
mod fulfillment;
mod observability;
mod outbox_cli;
mod pipeline;
mod scale_out;
mod secure;
mod socket;
mod standby;
mod support;

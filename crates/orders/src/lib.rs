//! The herald reference service: an order pipeline (HTTP API → PostgreSQL
//! with a transactional outbox → relay → Kafka → consumers).
//!
//! # Layout
//! - [`cli`]: the `orders` command line; every flag is also an env var.
//! - `main.rs`: parses the command line, installs logging, dispatches.

pub mod cli;

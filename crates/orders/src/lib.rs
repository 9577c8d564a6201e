//! The herald reference service: an order pipeline (HTTP API → PostgreSQL
//! with a transactional outbox → relay → Kafka → consumers keeping a read
//! model and a notification log).
//!
//! # Layout
//! - [`domain`]: order events, the state machine, validated inputs, and the
//!   model and rules both stores share (no SQL, no Kafka).
//! - [`store`]: [`store::OrderStore`], which the service's SQL implements on
//!   PostgreSQL ([`store::postgres`]: write model + outbox in one
//!   transaction, idempotency keys, read model, notifications, migrations)
//!   and on SQLite for the embedded development mode ([`store::sqlite`]);
//!   the consumers are wired once, for either.
//! - [`api`]: the axum routes, bearer-JWT authentication and per-customer
//!   authorization ([`api::auth`]), the error shape, the strict JSON
//!   extractor, health/readiness/metrics, OpenAPI.
//! - [`app`]: typed config and [`app::Application`], which runs the parts of
//!   one process (API, relay, consumers) under one shutdown signal.
//! - [`dlq`]: `orders dlq list|replay`.
//! - [`outbox`]: `orders outbox status|retry|discard|history`.
//! - [`fulfillment`]: the exactly-once fulfillment processor and its state.
//! - [`load`]: `orders load`, the load generator.
//! - [`metrics`]: `/metrics` from the components' live counters.
//! - [`telemetry`]: logs (text or JSON with trace ids) and OTLP trace export.
//! - [`cli`]: the command line; `main.rs` dispatches it.

pub mod api;
pub mod app;
pub mod cli;
pub mod dlq;
pub mod domain;
pub mod fulfillment;
pub mod load;
pub mod metrics;
pub mod outbox;
pub mod store;
pub mod supervisor;
pub mod telemetry;
